"""The subjects of the "known facts" set (Meng et al. 2022, section 2.1; MIT licence).

Causal tracing corrupts subject tokens with Gaussian noise of 3 × the standard deviation of
subject-token embeddings, measured over these subjects as in the paper.  Copied from
``known_1000.json`` (1,209 records; its 1195 distinct subjects, in file order) so the
measurement needs no data folder.
"""

from __future__ import annotations

KNOWN_SUBJECTS: tuple[str, ...] = tuple(
    """
Vinson Massif
Beats Music
Audible.com
The Big Bang Theory
MacApp
Giuseppe Angeli
Catalonia
Marshall Islands
Leslie Moonves
De finibus bonorum et malorum
Kirkpatrick Glacier
Army of the Guardians of the Islamic Revolution
Il Gazzettino
Xamarin
Eavan Boland
Comme j'ai mal
Juan Bautista de Anza
Alfred Hitchcock Presents
Tizen
Honus Wagner
samurai cinema
Roman Republic
Henri Debain
Adriano Celentano
Czech Republic national football team
Windows Media Player
NTFS
Knud, Hereditary Prince of Denmark
Don Shula
El Mercurio
Iron Man
Massachusetts Institute of Technology
Vietnam
The Tonight Show with Jay Leno
Philippines
Frederick Banting
Clifford Curzon
Windows Media Audio
Galatasaray University
Nokia
Northern Nigeria Protectorate
Deobandi
Odnoklassniki
Zeno of Verona
Jean-Pierre Van Rossem
Joseph Schumpeter
Felix Salmon
Grand Duchy of Finland
Goodreads
Rhine
Muawiyah I
Farrukhsiyar
Ibn Khaldun
Vichy France
John Pym
Christopher Paolini
Si la vie est cadeau
Brian De Palma
Magne Robo Gakeen
Electricidad
Swedish Orphan Biovitrum
Megan Rapinoe
Drake Britton
Pandora Hearts
Nicolas Gigault
LGA 775
Suite Habana
Emilia Rydberg
Adam Curtis
Mark Sanchez
Danish pastry
Jyllands-Posten
Sachimi Iwao
Yakuza 2
Lexus
Yamalo-Nenets Autonomous Okrug
The Physiological Society
William Herschel
Joseph Goebbels
Deutsche Bahn
Saint Domnius
Italy
Hotel Room
caffeine
Lokalbahn AG
Urdoviza Glacier
Manipur
2005 Southeast Asian Games
Lake Abitibi
Georgios Babiniotis
Maumoon Abdul Gayoom
People's Republic of Poland
Francesco Castellacci
Fluminense F.C.
Bundesautobahn 113
Petros Voulgaris
2005 Australian Open
Giulio Romano
Louth County Council
Louis Bonaparte
Ajinomoto Stadium
Internet Explorer
Singapore
Euromoney Institutional Investor
Indira Gandhi International Airport
Tang Empire
Metropolitan France
Simcoe Composite School
X11.app
Jeff Hardy
Izzy Asper
Process Explorer
Mitsubishi Electric
Antonio Sartorio
Thierry Henry
Abarth
Wayne Rooney
Hungarian Ladies Open
Kavkaz Center
Etobicoke North
Gregory XII
Le cose che vivi
Egypt
Coco Chanel
Zillow
Trento
Jan Swammerdam
Pius II
Royal National Theatre
Hamza ibn Abdul-Muttalib
Edmund Neupert
Seiyu Group
Gian Francesco Malipiero
United Kingdom
Madame de Montesson
Second French Empire
Grupo Globo
Vint Cerf
Olga Vittoria Gentilli
Henry Somerset, 7th Duke of Beaufort
King Chulalongkorn Memorial Hospital
York University
Michel Houellebecq
Camp Academia
United Kingdom of the Netherlands
Yellowstone National Park
Azerbaijan Soviet Socialist Republic
Fryderyk Chopin University of Music
Kingdom of Hungary
John XXIII
Paul Allen
Isabelle Breitman
Partick Thistle F.C.
Jean Bobet
Antonio Vivaldi
Kluuvi
iPod Classic
Rudolf Steiner
Office Online
Al-Hasakah Governorate
Shah Alam II
Edward Teller
Dirk Nowitzki
Germaine Greer
Barry Bonds
Lawrence Taylor
Nathalie Kosciusko-Morizet
Van Cliburn
James Northcote
Werner Heisenberg
2002 Australian Open
France Info
Hugh Cairns, 1st Earl Cairns
Louis XVII of France
Fantastic Fest
Josetsu
Final Cut Pro X
I ragazzi di via Panisperna
IJmuiden
Hebrew Theological College
Ariane Labed
Chatto & Windus
Pierre Gilliard
Le Globe
Alexa Internet
Revue de Paris
West Pakistan
De-Phazz
Smith & Wesson
Astley Cooper
Gus Poyet
Joensuu
Dick Butkus
La Jornada
Polisse
Bosco Gurin
Tim Tebow
Brandon Jenkins (football player)
Dominic Behan
Passer à l'acte
Iruma Air Base
Saint Amandus
Santo Stefano d'Aveto
Windows Mobile
B-29 Superfortress
Bandai Co., Ltd.
Johnny Unitas
Ukrainian State
Ruokolahti
Hellenic Army
Xbox
Mawson Glacier
Panama
Viacheslav Belavkin
Adi ibn Hatim
Kingdom of Bulgaria
Nishi-Matsuura District
J-pop
Eclogues
How to Make It in America
Schreckhorn
Henry Pym
Cairo American College
Khalid ibn al-Walid
William Fitzwilliam, 4th Earl Fitzwilliam
Steve Claridge
Lisa Ekdahl
Ginza Line
Core 2
Francis Poulenc
Raseborg
Benjamin Britten
Seychelles
Count Basie
State University of New York
Bilal ibn Ribah
Sundsvall Municipality
Walter Payton
Riona Hazuki
Gangnam Station
Siemiatycze
Annise Parker
Optimistique-moi
Maurice Richard
Farouk of Egypt
David Weigel
Meet the Press
Knowledge Graph
File Explorer
Sleater-Kinney
Vegard Skogheim
Dannii Minogue
Kyōto Prefecture
Jean Tinguely
Galata
Godrej Consumer Products Limited
Henri Estienne
Hidamari Sketch
Sandro Botticelli
Bubba Smith
Afghanistan
Tusculanae Disputationes
Satoru Iwata
Hyder Ali
Mykola Tomenko
Mount Cocks
Maurice Faure
Jacobo Zabludovsky
Lufkin
Platform Controller Hub
Saint Perpetuus
Jaromír Jágr
Show Me a Hero
Brazilian Football Confederation
Jeremy Paxman
Claude d'Annebault
Sukarno
Tim Horton
Australian Mathematical Society
Cabernet Franc
Greg Dyke
Germanus of Auxerre
RuneScape
Eiko Koike
Josh McCown
Frederick Noronha
North Side Gang
Franz Xaver Gabelsberger
Saint-Louis-de-Kent, New Brunswick
Quirinus of Sescia
Otto von Bismarck
Christian Medical College Ludhiana
Austrian Empire
Masoretic Text
Inoue Genan Inseki
IntelliPoint
Pierre Blanchar
Ivan Gudelj
Courant Institute of Mathematical Sciences
Alexandre Mercereau
Russian Post
Taliban insurgency
Edina High School
Prada
Paul Morand
Mike Piazza
Lupin III
Marugame
Anna Karenina
Benedict XVI
air traffic control
Amiibo
Sergey Aksyonov
Francis Blanche
Kadhalil Sodhappuvadhu Yeppadi
PlayStation Eye
Georges Ernest Boulanger
Ma vie en rose
Georges Pompidou
Windows Phone 7
Barry Zito
Ruhollah Khomeini
iPhone
Charlie Hebdo
Alexander Knaifel
Morteza Momayez
Rancho Petaluma Adobe
Hilaire Belloc
Hellenic Broadcasting Corporation
aloha
Mako Idemitsu
Uqba ibn Nafi
Aarau
Mizoram
Pope Heraclas of Alexandria
Moses Malone
Gerlache Strait
Hurricane Ridge
YouTube
Michio Kaku
Petrozavodsk
Phil Knight
Martha Nussbaum
Paul Otellini
Yanis Varoufakis
George Martin
Howard Glacier
Fifth Avenue
National Football Federation of Guatemala
Alfa Romeo MiTo
Rimmel
SNCF
Rogers Media
David Hilbert
Gavork-e Nalin Rural District
L'Histoire
Melitopol
Hafez
Giordano Bruno
Galerie des Machines
The New Dick Van Dyke Show
Ahmad al-Badawi
Hualapai people
Paracelsus
Banco di Napoli
Stephen Jay Gould
Mark Messier
Amar en tiempos revueltos
Joe Louis Arena
Grenada
Vita Semerenko
Alvin and the Chipmunks
Pius VIII
Law & Order
Brian Krzanich
The New School for Jazz and Contemporary Music
Pilipinas News
Pius XII
iTunes
Gary Lineker
Kurt Kreuger
Big Love
Shetland Islands
Giacinto Brandi
Plus belle la vie
European Physical Journal
Maryland Film Festival
O'Hare International Airport
Peru
Georges Duhamel
Sharmila Tagore
Helsinki
William Camden
Claude Arrieu
Udmurt Autonomous Soviet Socialist Republic
Jessica Jones
Delphine de Girardin
Auguste Rodin
Teen Mom
Argentine National Anthem
Jules Michelet
Kirkby Glacier
Otto Hauser
Lapland Odyssey
Delia Derbyshire
Shigeki Maruyama
Windows Genuine Advantage
Elizabeth Butler-Sloss, Baroness Butler-Sloss
Emmanuel Glacier
EA-18G Growler
Julian Huxley
Dynix
Eibenstock
Acca of Hexham
Sir Francis Baring, 1st Baronet
Georges Gorse
Ibrahim Pasha of Egypt
Amol Palekar
Kindle Fire
Koichi Ishii
Gaetano Moroni
iPod Mini
Mitsubishi Corporation
Philip Glass
Animator.ru
Alphonse James de Rothschild
Beijing
Johann Strauss I
British Museum
Harvard Law School
Voodoo Lounge
Acura ZDX
Fulgentius of Ruspe
Yangtze
Le Moniteur Universel
RIA Novosti
Luciano Pavarotti
Final Fantasy
Vilfredo Pareto
Steve Ballmer
Antonio Marcello Barberini
Windows Phone 8.1
Lumia series
Scania
Le Quotidien de Paris
Toulouse
Indonesia
Bernard Giraudeau
Il Posto
Hersekzade Ahmed Pasha
iTunes Radio
tatami
Gregory of Nazianzus
Die Nibelungen
The Young and the Restless
Yves Rocard
Mario Bros.
Viking Age
Sjogren Glacier
David Mellor
Donato Bramante
Lexus LF
Windows Embedded CE 6.0
Abdolkarim Soroush
Alfred Savoir
All India Anna Dravida Munnetra Kazhagam
Microsoap
Adolphe d'Ennery
The Late Late Show with Craig Ferguson
Arne Vidar Røed
Antoni Brodowski
Jeff Zucker
Ne partez pas sans moi
Miles Davis
2004 Australian Open
Norwegian Museum of Cultural History
Jeremy Vine
Hope and Anchor, Islington
Sandy Bridge
Second Spanish Republic
Le Mauricien
Windows Live Mail
Commonwealth of England
Tokyo Mew Mew
The Enchanter Reborn
Johnson Glacier
Dildar Ali Naseerabadi
Marguerite Yourcenar
Chanel
iPhone 3GS
Mi Reflejo
Chandigarh
Outside the Lines
Hideki Shirakawa
Weta Digital
William Bayliss
Juninho Pernambucano
Internet Explorer 10
Russell Wilson
Ibn Battuta
De Officiis
Lyse Doucet
Minnesota Strikers
Sir William Dunn, 1st Baronet, of Lakenheath
Wii Balance Board
Gwen Ifill
Osman I
Henri Maurice Berteaux
The Hague
Myongji University
Costa Rican Football Federation
Trailer Park Boys
Gareth Barry
Gatwick Airport
Second Polish Republic
Charles Babbage
Charles Louis Alphonse Laveran
Buichi Terasawa
Nez Perce County
Luhansk Oblast
Tycho Brahe
Sesamstraat
Birobidzhaner Shtern
Mohammad-Taqi Mesbah-Yazdi
Monster Rancher
United Airlines
La Vie
Buenos Aires Herald
Argentina
Matias Kupiainen
Spain national football team
Isola Dovarese
The Bill Cosby Show
Anastasy Vonsyatsky
Open University of Catalonia
Bandai Channel
Canada West Foundation
Lexus RX
Henrik Zetterberg
Alexandre Auguste Ledru-Rollin
Aretha Franklin
Sean Glennon
Kingdom of the Netherlands
Raina Kabaivanska
Chennai 600028
Prussian Partition
Joseph Locke
Die Tageszeitung
A las Barricadas
Geneva
Italian Chemical Society
Terry Wogan
Wii U
The Famous Teddy Z
Gamescom
Mayo Clinic
David Bohm
Abbasid Caliphate
Hohenlohe
Aisha
Tomaso Antonio Vitali
Tony Benn
Asturias
Android Auto
Jon Sopel
Romain-Octave Pelletier I
Saint Boniface
Kieler Nachrichten
Jerry West
South Georgia and the South Sandwich Islands
Michael Dorn
United Kingdom of Great Britain and Ireland
Franz Liszt
Central Bohemian Region
Arisaka
Lazio
Eredivisie
Russian State Archive of Literature and Art
Pittsburg County
John Humphrys
Evgeny Lifshitz
Victoria Derbyshire
Griebnitz Canal
Iran
Nikolay Strakhov
Alice Coltrane
Ernst Reuter
Spanish East Indies
Peggy Nash
King David Hotel bombing
Ch'ien Mu
Louis Nicolas Vauquelin
Jean-Jacques Annaud
St Patrick's Athletic F.C.
Edward Bulwer-Lytton
Lev Vygotsky
Mainichi Shinbun
Talmud Torah school
National Memorial Cemetery of the Pacific
Nodame Cantabile
Al-Mutawakkil
history of Limousin
Bill Gates
Frans Hubert Edouard Arthur Walter Robyns
2000 Australian Open
C-135 Stratolifter
LeBron James
Philippus van Limborch
KeyArena
Chris Cuomo
Mohsen Mirdamadi
Ant-Man
Caciocavallo
The Good Wife
Kingdom of Egypt
Parliament of Norway Building
Handel Ice Piedmont
Zabaykalsky Krai
Kamchatka Krai
Alitalia-Linee Aeree Italiane
Association of Football Federations of Azerbaijan
Mac Pro
Juan Prim, 1st Marquis of los Castillejos
Late Night with Conan O'Brien
Subodh Kant Sahay
Nagendra Singh
Selim I
Athanasius of Alexandria
Tenchi Universe
Victor Prosper Considerant
medical association
Mauna Kea
Manassas Regional Airport
Gita Sahgal
Ecuador
Valentin Rasputin
Rheinmetall MAN Military Vehicles
Ansovinus
Giuseppe Meazza Stadium (San Siro)
Roman Empire
Ulrika Eleonora, Queen of Sweden
iPod Touch
Saint-Marcellin
Oratory of Saint Philip Neri
Super Game Boy
Tim Cook
Hong Kong
Kingdom of Afghanistan
Skype Technologies
iPad 4
SunTrust Banks
Debenham Glacier
Holycross-Ballycahill GAA
The Bays
EDP Renewables North America
Adele Faccio
Jean-Baptiste Marchand
The Sports Reporters
Portuguese Football Federation
John Major
Henri Herz
Yannick Cahuzac
Hungarian Soviet Republic
Otway Massif
Maximianus of Ravenna
John Smoltz
The Cossacks
Commonwealth of the Philippines
Sialkot district
Sabinus of Spoleto
Lincoln Financial Field
Ignatius of Antioch
Margarita Moran-Floirendo
Windows Live OneCare
Alan Sugar
Engelberg
Sous le ciel de Paris
Federal Palace of Switzerland
macOS
John Broadwood
Xavier Saint-Macary
Nitzan Horowitz
Sadeq Larijani
Jarome Iginla
Terrell Owens
Michael Foot
Jeep Grand Cherokee
Face Dances
Time Machine (macOS)
Tennessee
Fudan University
Stamatios Kleanthis
Mercer Ellington
Marco Tardelli
SpeedWeek
Sergiu Luca
Disquisitiones Arithmeticae
Robert Schumann
Masako Natsume
Sir Charles Cayzer, 1st Baronet
Polymath project
Xbox Game Studios
Fat Albert and the Cosby Kids
Jeremy Clarkson
Paul McCartney
La Hora
Alasdair Milne
Roger Garaudy
Eddy Cue
Pierre de Marca
Game Boy Advance
Arnold Hermann Ludwig Heeren
Czech Socialist Republic
Jackie Robinson
Vierlingsbeek
Casa Loma Orchestra
Patuxent Wildlife Research Center
Les Francs-juges
Elvis Presley
Museum Secrets
Dany N'Guessan
Pentium 4
Laurent Lafitte
Peter Josef von Lindpaintner
Lexus ES
Rocky Mountain National Park
Higashikagawa
Ireland
Angela Ahrendts
A Charlie Brown Christmas
Eurovision Song Contest 1960
Super Audio CD
Delmarva Peninsula
Hiroshi Tsuchida
Michel Bernstein
Jan Machulski
Mark Walters
Triple H
Howlin' Wolf
The Ed Sullivan Show
David Suzuki Foundation
The Three Musketeers
Sir James Whitehead, 1st Baronet
Guyana
William McGillivray
Russell East Glacier
Orphan Black
The Voice Israel
Samsung Electronics
Bundesautobahn 9
Alain Marleix
Maharashtra
Nicolaas Pierson
United Launch Alliance
Claude de Longwy de Givry
Alexander Afanasyev
Gilles Marie Oppenord
Cosimo Fancelli
Postcards Records
Shane McMahon
Wii MotionPlus
Riverworld
No Game No Life
Sound Transit
Florent Cuvelier
Android TV
Jon Postel
Catalan self-determination referendum
Rosenberg Trio
Werner von Blomberg
Jonathan Pearce
Georges Rouault
La Fontaine's Fables
Yuliya Snigir
Peter Fincham
Dominik Hašek
Saxony
Ilya Kovalchuk
George Gershwin
Giorgi Melikishvili
Johannes Brahms
Grossman Nunataks
Il Postino: The Postman
Giunta Pisano
Lebedev Physical Institute
Linor Abargil
Manuel I of Portugal
Ludovic Sylvestre
Brookes Brothers
Brazil national football team
Salvatore Ferragamo Italia S.p.A.
Leo XIII
El Diario de Hoy
Chuwit Kamolvisit
Windows Live Mesh
Il Secolo XIX
Buenaventura Durruti
John Calvin
Lee Chang-dong
Norway
Chakrapani
Brown Peninsula
Satya Nadella
Henriette-Julie de Murat
Jacques-Jean Barre
DeepMind
Young Canadians
Criminal Minds
Abdalqadir as-Sufi
Clement VIII
Galileo Galilei
Newsstand
Papua New Guinea
Co-operative Commonwealth Federation (Ontario Section)
Sola Aoi
Sherlock Holmes
Chromebook
Mount Foster
Philip Mould
The Home Depot
Now Kandeh District
Chris McGregor
Freaks and Geeks
Gerolamo Cardano
Limoncello
Australian Antarctic Territory
Marcellin Berthelot
Lotte World Tower
Iiro Rantala
Charlottenborg Palace
Paris
Jon Ronson
Evgeni Malkin
JVC Kenwood Victor Entertainment
Charlie Conacher
David Crystal
Chromecast
Dronningens vagtmester
Gabrielle Fontan
Sviatoslav Knushevitsky
Kauniainen
Pitkevitch Glacier
Italy national football team
Hajime Mizoguchi
Francis de Sales
Jervis Inlet
Stephen Elop
Melilla
Richard Rawlinson
Pervez Musharraf
North Middlesex, Ontario
Vale of Glamorgan
Jean-Jacques Grunenwald
United Continental Holdings
Weimar Republic
Pelagius II
Simon McCoy
RioCan Real Estate Investment Trust
Wednesday Night Baseball
Thailand
Jung Ryeo-won
Montesquieu
France Dimanche
Ukraine
Babur
Soviet Air Defence Forces
State of Brazil
Panagarh
Pointe Coupee Parish
Soultrane
Xeon
Giacomo Barozzi da Vignola
Medical College and Hospital, Kolkata
Nismo
Maurice Bellemare
Newton Moore
Namor
Caterina Davinio
Sakichi Toyoda
Adam Schefter
Le Petit Parisien
Nicosia
Mathieu de Montmorency
Pierre Daniel Huet
Pierre Lescure
Dan Le Batard
Neethaane En Ponvasantham
Alfa Romeo 155
Polish Socialist Party
Ryan Smyth
Andrew Lloyd Webber
Killer Mike
CERN
Kang Ji-hwan
Bundesautobahn 6
The Leftovers
Musa Manarov
Ylvis
Friedrich Goldmann
Pius III
iPhone 1
Mike & Molly
The Thin Blue Line
Mir Damad
Palau
The Coca-Cola Company
Khedivate of Egypt
Amos Tversky
Canton of Fribourg
Edward Gibbon
Charles Nodier
Outlook.com
Der kleine Vampir
Kenya
Inuyasha
Yusuf al-Qaradawi
Ni es lo mismo ni es igual
Windows Internet Explorer 8
Sangamam
Eiko Shimamiya
Krzysztof Meyer
Kalamazoo County
Active Server Pages
Mount Discovery
Florida Championship Wrestling
Latin Empire
Herculez Gomez
College Football Live
Jean-Pierre Petit
Jules Moch
Pedro Caro, 3rd Marquis of la Romana
Luc Besson
La Voz del Interior
NBA Shootaround
Nikon
Flickr
BC Hydro
Gregory XIII
Chromebook Pixel
Giovanni Battista Viotti
Bing Videos
Willem Wilmink
Corinne Calvet
ActiveSync
Denmark
Steve Jobs
Lake Vostok
Eureka Brass Band
MacBook Air
Late Night with Jimmy Fallon
Gro Harlem Brundtland
Leonard Bernstein
Northwind Glacier
CarPlay
Guy Drut
The Lead with Jake Tapper
Uutisvuoto
Akbar
Aleksey Khomyakov
Pierre Contant d'Ivry
Alain Touraine
Ritt Bjerregaard
Chinese Skating Association
Wallonia
United States men's national soccer team
José Canseco
Sadratnamala
Stephen Curry
Final Fantasy III
Brandon University
Le Matin de Paris
iTunes Remote
Gianni Lancia
Mishal Husain
Henri de Toulouse-Lautrec
Kaliakra Glacier
D'Qwell Jackson
Fatimid caliphate
Claude Henri de Rouvroy, comte de Saint-Simon
Italian Social Movement
Yuki Uchida
Dawid Janowski
Basil of Caesarea
Edvard Grieg
Paul Klebnikov
Mojang
Giovanni di Bicci de' Medici
Kingdom of Bavaria
Jean-Joseph de Mondonville
Daniele Franceschini
Progressive Records
2011 Australian Open
Nancy Astor, Viscountess Astor
Broadcasting House
Kingdom of Great Britain
Celia en el colegio
Jason Campbell
Jimi Hendrix
1993 Bombay bombings
Taksim Military Barracks
Leonard Peikoff
Halle Berry
Claude Bernard
Datsun Sports
Ludwig von Mises
Lorenzo Perosi
Granius Licinianus
The Jack Benny Program
Acura RL
George Cadogan, 5th Earl Cadogan
Renata Polverini
Daniel Victor
Alberta Alliance Party
Melodiya
Sunny Hundal
John Coltrane
Reconstructionist Rabbinical College
Pekka Rinne
Avenue Montaigne
Pomarkku
The New Andy Griffith Show
Michael Faraday
Marie François Oscar Bardy de Fourtou
public transport in Istanbul
Muhammad Asad
The Dick Van Dyke Show
Michel Modo
Marcin Libicki
Massachusetts
Acura EL
Paul IV
Irina Khakamada
Nathan Myhrvold
Indiana
Mexico national football team
Edinburgh Mathematical Society
The Amazing Race
Semyon Vorontsov
Thelonious Monk
Giuseppe Baini
East Japan Railway Company
Leinster
Le Silence de la mer
Pat Tillman
Thor
Yalkut Yosef
WWE
Yohann Diniz
Sydney Peace Prize
Canadian Cancer Society
Klaas Schilder
Canada men's national soccer team
Chaos Communication Congress
Epiphone
Gambia River
Chris Stringer
macOS Server
L'Aurore
Nyon
Enzo Cannavale
Andrew Gilligan
Il giuramento
Babylas of Antioch
Acura ILX
Galen
David Dimbleby
George Mihai Florescu
TUIfly Nordic
Paanch
North Berwick
Anne-Marie Idrac
Saint Valentine
Guido Pieters
Valdemarsvik
Acura RDX
Pennzoil
Windows Me
Masaichi Kaneda
Rutland Barrington
Muhammad al-Bukhari
OS X Yosemite
Faygo
Adam Kendon
Craig Federighi
Ryu Hyeon-kyeong
Gianfranco Fini
Lage Raho Munna Bhai
Bing Maps
Showtime Networks
Mehdi Hosseini
Hawaii
Yammer
Andheri
Yitzhak Ben-Zvi
William Bernard Ullathorne
EMI
George Newnes
Choi Myeong-gil
Drew Brees
Game & Watch
Nonchan Noriben
Bavarian National Museum
Bundesautobahn 4
Masaccio
Mas Canciones
Ahmed Zewail
Velayudham
Umberto Guidoni
Bundesautobahn 14
Osvaldo Genazzani
Francesco Rutelli
Photinus of Sirmium
Dwynwen
Veneto
Mercure de France
Kingdom of Iraq
Patna
Bouygues Telecom
Phil Jackson
Al-Mahdi
Eusebius of Vercelli
Irish Free State
Sultan Satuq Bughra Khan
Scooby Doo
Yogi Berra
Chiasso
Panathenaic Stadium
Italian Football Federation
Jennie Lee, Baroness Lee of Asheridge
Acura TL
Marco Di Vaio
Alfa Romeo 6C
Rupert of Salzburg
Luis del Sol
Books
Brett Hull
Concordia University
Saikano
Louis-Nicolas Davout
Akira Toriyama
Boris Diaw
Qing dynasty
WebM
David Cameron
Muhammad
Bhayanak Maut
University of Washington
Lopburi
Honnavar
The Biskitts
Patrick Henry College
Pius VI
Stadio Flaminio
Liquor Control Board of Ontario
Sunday Night Baseball
Miyuki Sawashiro
Leon Brittan
Voyage to Cythera
Rufiji River
Rowan & Martin's Laugh-In
Cape Adams
B-47 Stratojet
American Airlines Center
iPhone 4s
Bundesautobahn 3
Yvan Goll
Gmina Kleczew
Janet Jackson
Boniface III
Skaz
Daiki Arioka
Indian Space Research Organisation
Bhaktisiddhanta Saraswati
Elizabeth R
Hendrikus Colijn
Givenchy
Roger Staubach
Teemu Sälännä
Ray Kurzweil
statistical model
2013 Australian Open
Windows 95
Jeep Wrangler
Final Fantasy Legend III
Scott Forstall
Giovanni Sgambati
Pierre Alcover
Gianni Ferrio
Henryk Sienkiewicz
Aftonbladet
Kyle Farnsworth
Gregory XVI
My Sister Sam
Devonshire Arms
Ballers
""".strip().splitlines()
)
